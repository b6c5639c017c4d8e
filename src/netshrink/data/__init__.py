"""Real datasets that ship inside packages (nothing is downloaded): digits, Fashion-MNIST, prose, similarity ratings."""
from netshrink.data.images import digits, fashion_mnist
from netshrink.data.text import prose, sentences, similarity_pairs, wiki_sentences

__all__ = ["digits", "fashion_mnist", "prose", "sentences", "similarity_pairs", "wiki_sentences"]
