"""fastdinov2.train"""
