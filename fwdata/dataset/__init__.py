"""The dataset contract and its on-disk rules: formats (pydantic), camera maths, video files, writing samples."""
