"""What a run reports: records and progress lines, figures, TensorBoard, diagnostics."""
