"""SAMEmbedding web: the module's matching in a browser, on trame-slicer's MRML slice views (``samembed web``).

Needs the ``web`` extra (``pip install -e ".[web]"``). Layers: :mod:`.security` (pure Python), :mod:`.session`
(app logic on MRML, driving ``SAMEmbeddingLib``), :mod:`.ui` (the page) and :mod:`.app` (the trame server).
"""
