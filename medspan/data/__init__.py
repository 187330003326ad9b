"""medspan.data"""
