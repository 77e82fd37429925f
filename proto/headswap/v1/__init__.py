"""Generated protobuf code for the wire contract headswap.v1 (see headswap.proto)."""
