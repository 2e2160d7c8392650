"""The tinkex cookbook: renderers, training loops (supervised, RL, DPO) and runnable recipes.

The loops take any service client with the Tinker API -- `tinkex.ServiceClient()` by default,
which starts the embedded server when nothing is configured, or the official `tinker` SDK's.
"""
