"""Learned features at work: embeddings of any trained model, k-NN evaluation, a faiss gallery and retrieval."""
