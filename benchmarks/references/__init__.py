"""Reference servers measured beside vae-serve in `make bench` (issue 13): NVIDIA Triton and a naive grpcio
server, both answering the Open Inference Protocol's ModelInfer on the same ONNX files."""
