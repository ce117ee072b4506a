"""Everything that differs by kind of model, one module per family.

A family decides how inputs are made for a workload and for verification, which fidelity
measure matters, what the baseline is, and how a served request becomes tensors and the
outputs a response. Nothing outside this package and the serving codecs asks what kind of
model it holds.
"""
