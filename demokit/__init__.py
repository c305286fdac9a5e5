"""Generated demo data and the loopback image server the demo build downloads from.

Not part of the training path: `tools/build_yfcc15m.py --demo`, `tools/demo.py` and the tests use
it to make a YFCC-format data set with known classes on a machine without internet.
"""
