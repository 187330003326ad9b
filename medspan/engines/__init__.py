"""medspan.engines"""
