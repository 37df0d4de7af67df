"""rex-reapi: the Bazel Remote Execution API v2 over gRPC, as the rex protocol ``reapi``."""

__all__: list[str] = []
