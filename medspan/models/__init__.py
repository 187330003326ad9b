"""medspan.models"""
