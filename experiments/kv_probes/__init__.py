"""Probes of the key-value arithmetic experiment: why CALM does or does not
reach Table 1 at CPU scale. Each asks one question (README.md says more):

  learnability   how fast a plain decoder learns one KV task from scratch:
                 what an anchor of a given size can learn at all
  readout        whether m_A holds each key's value where one linear map,
                 fit on compose keys, reads it on held-out keys
  bridge_writes  how large a trained composition's writes are beside the
                 anchor residual they land on, and where its heads look
  errors         how a trained composition gets KV-MATH wrong: keys never
                 right (no generalisation) or values delivered imprecisely
  anchor_probe   whether the anchor can use values written into its
                 residual stream at all, with an oracle for m_A and bridge

  python -m experiments.kv_probes.<name> --workdir=DIR  (a kv_arithmetic
  workdir; learnability needs none) or --config=tiny (seconds, the tests).
"""
