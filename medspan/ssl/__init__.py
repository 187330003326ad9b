"""medspan.ssl"""
