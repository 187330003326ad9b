"""medspan.atlas"""
