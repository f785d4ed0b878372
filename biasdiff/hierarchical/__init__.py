"""The controlled setting: tree-grammar data and its exact denoisers.

Public API:
  make_grammar, paper_grammar, Grammar       the random tree grammar
  sample_sequences                           seeded, vectorised tree sampler
  parse, is_valid                            bottom-up parse and exact log P(x)
  exact_denoiser                             BP_0 and filtered BP_k posterior means
  empirical_denoiser, prior_denoiser         the memorising and the prior baselines
  make_denoiser                              any of them as a function of (x_t, t)
  log_likelihood, log_partition              log-probability with masked positions
  Corpus, build_corpus, load_or_build_corpus stored training and held-out pools
"""

from biasdiff.hierarchical.bp import (DEFAULT_EPSILON, exact_denoiser, leaf_field,
                                      log_likelihood, log_partition, posterior_marginals)
from biasdiff.hierarchical.corpus import (Corpus, build_corpus, content_overlap,
                                          load_corpus, load_or_build_corpus, save_corpus,
                                          verify_regeneration)
from biasdiff.hierarchical.denoisers import (empirical_denoiser, make_denoiser,
                                             prior_denoiser)
from biasdiff.hierarchical.grammar import Grammar, make_grammar, paper_grammar
from biasdiff.hierarchical.parse import is_valid, parse
from biasdiff.hierarchical.sampler import GENERATOR_VERSION, sample_sequences
