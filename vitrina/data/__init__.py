"""Data sources (Fashion-MNIST, emoji, Open Clip Art, folders, caption files), safe image decoding,
transforms, prompt templates and the torch datasets built on them."""
