"""Default settings shared by the API, the CLI and the Slicer module (torch-free, so the CLI starts fast)."""

#: half-size (mm) of the affine-prior search window of ``Matcher(prior_window_mm=...)`` and ``--prior-window``
DEFAULT_PRIOR_WINDOW_MM = 50.0

#: half-size (mm) of the local search boxes of ``match(refine=True)`` (see :mod:`samembed.refine`)
DEFAULT_REFINE_WINDOW_MM = 20.0

#: whether ``match`` polishes matches with image intensities by default (see :mod:`samembed.intensity`)
DEFAULT_POLISH = True
