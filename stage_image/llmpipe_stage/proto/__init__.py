"""Generated gRPC code for the stage wire protocol (`stage.proto`); see `build.py`.

The `*_pb2*.py` files are produced by `make proto` and committed; never edit them by hand
(tests/dataplane/test_proto.py checks that regenerating yields identical files).
"""
