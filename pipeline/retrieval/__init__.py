"""Learned features at work: a split embedded on the cluster (Ray Data), its faiss gallery searched, contact sheets."""
