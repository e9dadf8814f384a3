"""Request rules: what a client or operator may send, and the errors they get.

``cli`` is the ``vllm serve`` argument group, ``keep_ratio`` the validation of
the per-request ``vllm_xargs.keep_ratio`` field, ``media`` the media-loading
failures that are the client's fault (400, not 500). Nothing here changes
vLLM; ``vllm_trio.patches`` wires these rules into vLLM's objects.
"""
