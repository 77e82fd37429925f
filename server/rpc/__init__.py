"""The gRPC edge: the only server package that imports grpc or the generated protobuf code."""
