"""Data for training and evaluation: files read and checked, chat templates, tokenised sets and batches."""
