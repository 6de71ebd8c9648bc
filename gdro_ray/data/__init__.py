"""Offline group datasets: prompt sets, the Parquet row format, and the Ray Data generation pipeline."""
