"""The audio core: G.711 mu-law, streaming resampling, the jitter buffer and playout decisions,
and mono WAV files for the tools (all sans-io but for the thin WAV file wrappers).
"""
