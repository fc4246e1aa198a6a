"""Protocol messages shared by host and guest, compiled from the .proto files here at build time."""
