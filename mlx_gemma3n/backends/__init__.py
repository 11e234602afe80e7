"""What a backend needs beyond the plain path (Metal, CUDA): MLX's CPU backend gets its matmuls split over the cores."""
