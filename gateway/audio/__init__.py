"""The audio core: G.711 mu-law, streaming resampling, the jitter buffer and playout decisions
(all sans-io).
"""
