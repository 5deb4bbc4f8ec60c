"""fastdinov2.data"""
