"""The data paths run on given frames, nothing attached: engines and ``xdplb replay``."""
