"""Reverse KL, skew KL and generalised JSD losses."""


def components():
    return []
