"""Building blocks (embeddings, the TAPF polarity gate, attention, feed-forward); `model.models` composes them."""
