"""The index: a folder of images embedded into SQLite (source of truth) plus a derived FAISS file.

``embed.index_folder`` builds or updates one; ``store.IndexStore`` reads and writes it.
"""
