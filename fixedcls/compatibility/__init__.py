"""Compatibility between model generations (CoReS, CL2R): the criteria (`criteria`), the matrix of trained
models (`matrix`), stored galleries (`gallery`), training the generations (`generations`) and their
reports (`report`).
"""
