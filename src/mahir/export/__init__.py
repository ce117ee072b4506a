"""The ways a model changes format: torch -> ONNX -> OpenVINO IR, torch -> IR directly, each
verified against the original on shapes other than the traced ones before it is kept."""
