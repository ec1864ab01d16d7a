import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# The fuzz tests of test_reliability.py draw as many examples as the profile says: "ci" (the default) keeps
# the suite fast; PRECOND_FUZZ=long (make fuzz) is the longer run by hand.
settings.register_profile("ci", max_examples=12, deadline=None)
settings.register_profile("long", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("PRECOND_FUZZ", "ci"))
