"""Candidates and final lists: FAISS retrieval, live catalogue state, rerank, trending, cold start.

    user vectors ─▶ ItemIndex.search (candidates) ─▶ Reranker.rerank (filters, boost, diversity,
    "because") ─▶ per-user lists;   Trending.top for users without history;
    AttributeEmbedder for items the model never saw (their vectors go to ItemIndex.add and
    Reranker.add_items).
"""

from index.catalogue import Catalogue
from index.cold_start import AttributeEmbedder
from index.item_index import ItemIndex
from index.rerank import Reranker, RerankConfig, UserContext
from index.trending import Trending

__all__ = ["AttributeEmbedder", "Catalogue", "ItemIndex", "RerankConfig", "Reranker", "Trending", "UserContext"]
