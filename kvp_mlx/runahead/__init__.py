"""KV-Runahead (Cho et al., arXiv 2405.05329): the prompt's prefill split across the ranks of an
``mx.distributed`` group. ``prefill`` is the prefill method, ``split`` the load-balancing cost
model, ``group`` the process group and its watchdog, ``bench`` the multi-process benchmark."""
