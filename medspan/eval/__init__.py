"""medspan.eval"""
