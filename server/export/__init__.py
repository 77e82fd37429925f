"""Building backbone directories: ONNX models, preprocessing and a manifest, each checked against its source."""
