"""fastdinov2.eval"""
