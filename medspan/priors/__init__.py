"""medspan.priors"""
