"""The floor below export and deploy: what a runtime computes, independent of any stage."""
