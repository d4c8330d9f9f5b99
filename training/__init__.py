"""PyTorch side of sdde-serve: models, saliency maps, training methods (losses) and the trainer."""
