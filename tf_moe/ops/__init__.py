"""Pure tensor functions: gating maths (`gating`) and sparse dispatch (`dispatch`)."""
