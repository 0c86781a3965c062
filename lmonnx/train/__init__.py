"""Training: the course's LanguageModel in Keras 3 (the only package, with export, that imports
TensorFlow)."""
