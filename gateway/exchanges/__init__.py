"""The exchange log: one record per upstream call, written off the hot path.

``record`` is the value, ``recorder`` builds it while the answer streams,
``writer`` owns the bounded queue and the one task that writes batches,
``sqlite`` / ``postgres`` are the stores (``schema`` their migrations),
``log`` puts them together for the app.
"""
