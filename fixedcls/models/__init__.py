"""The network: regular-polytope and learned heads with their losses (`heads`), and the classifier a
timm backbone, a projection and a head make (`classifier`).
"""
