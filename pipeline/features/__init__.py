"""Learned features, below training: a model's feature layer, k-NN and retrieval metrics, and the gallery files
(arrays and a faiss index). Training validates with k-NN, evaluation measures retrieval, `retrieval` embeds and
searches: all read them from here."""
