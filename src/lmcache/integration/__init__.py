"""Engine integrations under upstream LMCache's import paths."""
