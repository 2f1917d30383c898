"""Ranking transformer definition and its ONNX export (naive, user_encoder, target_fusion)."""
